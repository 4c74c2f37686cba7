//! Receipts (off by default): the consumer reports each message's outcome back to the
//! producer's store, so the producer learns that the effect happened, or compensates when
//! the consumer failed for a business reason.
//!
//! The flow: the relay publishes a row and marks it `SENT`; the consumer processes the
//! message (through its inbox) and publishes a receipt built by [`receipt_message`] to the
//! producer's receipt destination; the producer consumes that destination with a
//! [`ReceiptHandler`], which records it:
//!
//! - `completed` moves the row to `COMPLETED`;
//! - `failed` moves it to `FAILED` and runs the producer's compensation **in the same
//!   database transaction**, so the compensation runs once however often the receipt
//!   arrives, and not at all if the transaction fails (the receipt is then retried).
//!
//! With [`crate::StoreConfig::receipt_timeout`] set, a `SENT` row with no receipt within the
//! timeout is made due again by the receipt sweep ([`Receipts::redeliver_overdue`], a loop
//! of its own in a running relay) and the relay publishes it again (each time counts an
//! attempt; past the retry policy's `max_attempts` the row goes `DEAD`). The consumer's inbox recognises the repeat
//! and skips the effect, so the consumer must send the receipt again on
//! [`crate::InboxOutcome::Duplicate`] too. `COMPLETED` and `FAILED` rows are deleted by
//! [`crate::SqlStore::cleanup`] after `sent_retention`, in batches.

use async_trait::async_trait;
use futures::future::BoxFuture;
use surety_core::{
    Delivery, Error, Handler, HandlerError, Message, MessageId, Outcome, Result, headers,
};

use crate::backend::{Backend, On};
use crate::entry::{EntryState, OutboxEntry};
use crate::error::{ADAPTER, storage};
use crate::store::SqlStore;
use crate::transitions;

/// What a consumer reports about one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// The effect happened.
    Completed,
    /// The consumer refused the message for a business reason: the producer compensates.
    Failed {
        /// Why, as the consumer tells it.
        reason: String,
    },
}

const COMPLETED: &str = "completed";
const FAILED: &str = "failed";

/// The receipt a consumer publishes after processing `delivered`: bound for
/// `receipt_destination`, keyed by the delivered message's id so receipts of one message
/// stay in order, with no payload.
pub fn receipt_message(
    delivered: &Message,
    receipt_destination: &str,
    outcome: &ReceiptOutcome,
) -> Message {
    let message = Message::new(receipt_destination, Vec::new())
        .with_key(delivered.id().as_str())
        .with_header(headers::RECEIPT_FOR, delivered.id().as_str());
    match outcome {
        ReceiptOutcome::Completed => message.with_header(headers::RECEIPT_OUTCOME, COMPLETED),
        ReceiptOutcome::Failed { reason } => message
            .with_header(headers::RECEIPT_OUTCOME, FAILED)
            .with_header(
                headers::RECEIPT_REASON,
                surety_core::raw::header_safe(reason),
            ),
    }
}

/// Reads a receipt: the id it reports on and the outcome. A message that is not a receipt
/// is an `InvalidMessage` error (retrying cannot fix it).
pub fn parse_receipt(message: &Message) -> Result<(MessageId, ReceiptOutcome)> {
    let id = message
        .header(headers::RECEIPT_FOR)
        .ok_or_else(|| Error::invalid(format!("not a receipt: no {} header", headers::RECEIPT_FOR)))
        .and_then(MessageId::parse)?;
    let outcome = match message.header(headers::RECEIPT_OUTCOME) {
        Some(COMPLETED) => ReceiptOutcome::Completed,
        Some(FAILED) => ReceiptOutcome::Failed {
            reason: message
                .header(headers::RECEIPT_REASON)
                .unwrap_or("no reason given")
                .to_owned(),
        },
        other => {
            return Err(Error::invalid(format!(
                "receipt outcome must be {COMPLETED:?} or {FAILED:?}, got {other:?}"
            )));
        }
    };
    Ok((id, outcome))
}

/// A failed receipt, handed to the producer's compensation.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The outbox row of the message that failed, as it was enqueued.
    pub entry: OutboxEntry,
    /// The consumer's reason.
    pub reason: String,
}

/// Records receipts in a [`SqlStore`]. Cheap to clone.
#[derive(Debug)]
pub struct Receipts<DB: Backend> {
    store: SqlStore<DB>,
}

impl<DB: Backend> Clone for Receipts<DB> {
    fn clone(&self) -> Self {
        Receipts {
            store: self.store.clone(),
        }
    }
}

impl<DB: Backend> Receipts<DB> {
    pub(crate) fn new(store: SqlStore<DB>) -> Self {
        Receipts { store }
    }

    /// The message `id` was processed: `SENT` (or still `PENDING`) becomes `COMPLETED`.
    /// Returns `false` when nothing changed (a repeated receipt, or an id this store does
    /// not hold).
    pub async fn complete(&self, id: &MessageId) -> Result<bool> {
        let on = On::Pool(self.store.pool());
        let changed =
            transitions::apply_receipt(&self.store, on, id, EntryState::Completed, None).await?;
        Ok(changed.is_some())
    }

    /// The receipt sweep: up to `limit` `SENT` rows whose receipt is older than
    /// [`crate::StoreConfig::receipt_timeout`] go back to `PENDING`, due now, for the relay
    /// to publish again. Returns how many; 0 when receipts are off. A running relay
    /// ([`crate::Relay::spawn`]) runs it in a loop of its own, and
    /// [`crate::Relay::run_once`] and [`crate::Relay::drain`] once per call.
    pub async fn redeliver_overdue(&self, limit: usize) -> Result<u64> {
        match self.store.config().receipt_timeout {
            Some(timeout) => transitions::redeliver_overdue(&self.store, timeout, limit).await,
            None => Ok(0),
        }
    }

    /// The message `id` failed at the consumer for `reason`: in one transaction the row
    /// becomes `FAILED` and `compensate` runs on that transaction. Returns `false`, without
    /// calling `compensate`, when nothing changed (a repeated receipt, an unknown id). An
    /// error from `compensate` rolls both back.
    pub async fn fail<F>(&self, id: &MessageId, reason: &str, compensate: F) -> Result<bool>
    where
        F: for<'c> FnOnce(&'c mut DB::Connection, Failure) -> BoxFuture<'c, Result<()>> + Send,
    {
        let mut tx = self.store.begin("record a failed receipt").await?;
        let on = On::Conn(&mut *tx);
        let Some(entry) =
            transitions::apply_receipt(&self.store, on, id, EntryState::Failed, Some(reason))
                .await?
        else {
            let _ = tx.rollback().await;
            return Ok(false);
        };
        let failure = Failure {
            entry,
            reason: reason.to_owned(),
        };
        match compensate(&mut tx, failure).await {
            Ok(()) => {
                tx.commit()
                    .await
                    .map_err(|e| storage("commit a failed receipt", e))?;
                tracing::info!(message_id = %id, reason, "consumer reported a failure; compensated");
                Ok(true)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }
}

/// Consumes the producer's receipt destination and records each receipt, running
/// `compensate` for failures (once per message, in the transaction that marks it
/// `FAILED`). A message that is not a receipt is rejected (dead-lettered with the reason);
/// a database error is a retry.
pub struct ReceiptHandler<DB: Backend, F> {
    receipts: Receipts<DB>,
    compensate: F,
}

impl<DB, F> ReceiptHandler<DB, F>
where
    DB: Backend,
    F: for<'c> Fn(&'c mut DB::Connection, Failure) -> BoxFuture<'c, Result<()>> + Send + Sync,
{
    /// A handler recording receipts in `store`.
    pub fn new(store: &SqlStore<DB>, compensate: F) -> Self {
        ReceiptHandler {
            receipts: store.receipts(),
            compensate,
        }
    }
}

#[async_trait]
impl<DB, F> Handler for ReceiptHandler<DB, F>
where
    DB: Backend,
    F: for<'c> Fn(&'c mut DB::Connection, Failure) -> BoxFuture<'c, Result<()>> + Send + Sync,
{
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<Outcome, HandlerError> {
        let (id, outcome) = match parse_receipt(&delivery.message) {
            Ok(receipt) => receipt,
            Err(e) => return Ok(Outcome::reject(e.to_string())),
        };
        let changed = match outcome {
            ReceiptOutcome::Completed => self.receipts.complete(&id).await?,
            ReceiptOutcome::Failed { reason } => {
                self.receipts
                    .fail(&id, &reason, |conn, failure| {
                        (self.compensate)(conn, failure)
                    })
                    .await?
            }
        };
        if !changed {
            tracing::debug!(message_id = %id, adapter = ADAPTER, "receipt changed nothing (a repeat or an unknown id)");
        }
        Ok(Outcome::Ack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_and_refuse_strangers() {
        let order = Message::new("orders", "x");
        let done = receipt_message(&order, "orders.receipts", &ReceiptOutcome::Completed);
        assert_eq!(done.destination(), "orders.receipts");
        assert_eq!(
            parse_receipt(&done).unwrap(),
            (order.id().clone(), ReceiptOutcome::Completed)
        );
        let failed = receipt_message(
            &order,
            "orders.receipts",
            &ReceiptOutcome::Failed {
                reason: "out of\nstock".into(),
            },
        );
        assert_eq!(
            parse_receipt(&failed).unwrap().1,
            ReceiptOutcome::Failed {
                reason: "out of stock".into()
            }
        );
        let e = parse_receipt(&order).unwrap_err();
        assert_eq!(e.kind(), surety_core::ErrorKind::InvalidMessage);
        let odd = done.with_header(headers::RECEIPT_OUTCOME, "maybe");
        assert!(parse_receipt(&odd).is_err());
    }
}
