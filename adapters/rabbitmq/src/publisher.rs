//! Send with confirm: a confirm-mode channel, every publish `mandatory`, many in flight.

use std::sync::Arc;

use async_trait::async_trait;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use surety_core::raw::Sender;
use surety_core::{Error, ErrorKind, Message, Receipt, Result};
use tokio::sync::oneshot;

use crate::ADAPTER;
use crate::codec;
use crate::confirms::{ReturnKey, Verdict};
use crate::error;
use crate::shared::{ConfirmChannel, Connector};

const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// Publishes one message on `channel` and waits for its confirm.
///
/// - acked, and no `basic.return` for this very message: confirmed.
/// - returned (312 NO_ROUTE): [`ErrorKind::Unroutable`], never a success. lapin hands a
///   return to whichever confirm it completes next, so returns are matched to their
///   publish by the channel's tracker (see `confirms.rs`), not by lapin's pairing.
/// - `Nack`: [`ErrorKind::Rejected`], retryable.
/// - the channel or connection fails, or no confirm within the timeout:
///   [`ErrorKind::OutcomeUnknown`], retryable.
pub(crate) async fn publish_confirmed(
    channel: &ConfirmChannel,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
    body: &[u8],
) -> Result<()> {
    let config = channel.connector().config();
    let id = properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default();
    let (ch, tracker) = channel.get().await?;
    let started = tracker.start();
    let pending = match ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            MANDATORY,
            body,
            properties,
        )
        .await
    {
        Ok(p) => p,
        Err(e) => {
            return Err(match e.kind() {
                // Refused before anything was written.
                lapin::ErrorKind::InvalidChannelState(..)
                | lapin::ErrorKind::InvalidConnectionState(..) => error::unavailable("publish", e),
                _ => error::outcome_unknown("a publish", e),
            }
            .with_context("message_id", id));
        }
    };
    let (reply, verdict) = oneshot::channel();
    started.register(
        ReturnKey {
            message_id: id.clone(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        },
        pending,
        Some(reply),
    );
    let verdict = match tokio::time::timeout(config.confirm_timeout, verdict).await {
        Ok(Ok(Ok(v))) => v,
        Ok(Ok(Err(e))) => {
            return Err(error::outcome_unknown("a publish", e).with_context("message_id", id));
        }
        Ok(Err(_)) => {
            // The tracker task ended without an answer (the runtime is shutting down).
            return Err(Error::new(
                ErrorKind::OutcomeUnknown,
                "the publisher confirm was lost; the broker may or may not hold the message",
            )
            .with_context("adapter", ADAPTER)
            .with_context("message_id", id));
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::OutcomeUnknown,
                format!(
                    "no publisher confirm within {:?}; the broker may or may not hold the message",
                    config.confirm_timeout
                ),
            )
            .with_context("adapter", ADAPTER)
            .with_context("message_id", id));
        }
    };
    match verdict {
        Verdict::Confirmed => Ok(()),
        Verdict::Returned { code, text } => Err(Error::new(
            ErrorKind::Unroutable,
            format!("RabbitMQ returned the message: {code} {text} (no queue is bound for {routing_key:?})"),
        )
        .with_context("adapter", ADAPTER)
        .with_context("destination", routing_key)
        .with_context("message_id", id)),
        Verdict::Nacked => Err(Error::new(
            ErrorKind::Rejected,
            "RabbitMQ nacked the message (it could not store it)",
        )
        .with_retryable(true)
        .with_context("adapter", ADAPTER)
        .with_context("destination", routing_key)
        .with_context("message_id", id)),
        Verdict::NotRequested => Err(Error::new(
            ErrorKind::OutcomeUnknown,
            "the channel was not in confirm mode; outcome unknown",
        )
        .with_context("adapter", ADAPTER)
        .with_context("message_id", id)),
    }
}

/// The adapter's send: one confirmed `mandatory` publish through the router, on a
/// confirm channel of its own (reopened after failures). Validation, span, metrics and
/// retries are the shared publish path's.
pub(crate) struct RabbitSender {
    channel: ConfirmChannel,
}

impl RabbitSender {
    pub(crate) fn new(connector: Arc<Connector>) -> Self {
        RabbitSender {
            channel: ConfirmChannel::new(connector, "publisher channel"),
        }
    }

    /// RabbitMQ's own naming rules, on top of core's: a bad name is the caller's error.
    fn check(message: &Message) -> Result<()> {
        crate::topology::check_destination(message.destination())
            .map_err(|e| Error::invalid(e.message().to_owned()).with_context("adapter", ADAPTER))
    }
}

#[async_trait]
impl Sender for RabbitSender {
    async fn send(&self, message: &Message) -> Result<Receipt> {
        Self::check(message)?;
        let router = &self.channel.connector().config().router_exchange;
        publish_confirmed(
            &self.channel,
            router,
            message.destination(),
            codec::encode(message),
            message.payload(),
        )
        .await?;
        Ok(Receipt::for_message(message))
    }

    async fn send_oneway(&self, message: &Message) -> Result<()> {
        Self::check(message)?;
        let router = &self.channel.connector().config().router_exchange;
        let (ch, tracker) = self.channel.get().await?;
        let started = tracker.start();
        let confirm = ch
            .basic_publish(
                router.as_str().into(),
                message.destination().into(),
                BasicPublishOptions::default(),
                message.payload(),
                codec::encode(message),
            )
            .await
            .map_err(|e| error::unavailable("publish", e))?;
        // Nobody waits for this confirm (the caller accepted at-most-once), but the
        // tracker reads it: lapin may hand it another publish's return.
        started.register(
            ReturnKey {
                message_id: message.id().as_str().to_owned(),
                exchange: router.clone(),
                routing_key: message.destination().to_owned(),
            },
            confirm,
            None,
        );
        Ok(())
    }
}
