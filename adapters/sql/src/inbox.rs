//! The idempotent consumer: one key per `(consumer_name, message_id)`, written in the
//! same transaction as the effect.

use futures::future::BoxFuture;
use surety_core::{Error, Message, MessageId, Result, telemetry};

use crate::error::{ADAPTER, storage};
use crate::store::{SqlConnection, SqlStore};

/// Longest consumer name accepted, in bytes.
pub const MAX_CONSUMER_NAME_LEN: usize = 255;

/// What [`Inbox::process`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboxOutcome<T> {
    /// First delivery: the effect ran and committed with the key; its result.
    Applied(T),
    /// The key was already there: the effect was skipped. Ack the delivery.
    Duplicate,
}

impl<T> InboxOutcome<T> {
    /// Whether the delivery was a duplicate.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, InboxOutcome::Duplicate)
    }
}

/// The inbox of a [`SqlStore`]. Cheap to clone.
///
/// ```no_run
/// # async fn run(store: surety_sql::SqlStore, message: surety_core::Message) -> surety_core::Result<()> {
/// use surety_sql::sqlx::SqliteConnection;
/// let outcome = store
///     .inbox()
///     .process("cart", &message, |tx: &mut SqliteConnection| {
///         Box::pin(async move {
///             surety_sql::sqlx::query("DELETE FROM cart_items WHERE cart_id = 7")
///                 .execute(&mut *tx)
///                 .await
///                 .map_err(|e| surety_core::Error::new(surety_core::ErrorKind::Storage, "clear cart").with_source(e))?;
///             Ok(())
///         })
///     })
///     .await?;
/// # let _ = outcome; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Inbox {
    store: SqlStore,
}

impl Inbox {
    pub(crate) fn new(store: SqlStore) -> Self {
        Inbox { store }
    }

    /// Runs `effect` once per `(consumer, message id)`: opens a transaction on the store's
    /// pool, records the key, runs `effect` on the same transaction and commits both. A key
    /// already present skips the effect ([`InboxOutcome::Duplicate`]). An error from
    /// `effect` rolls back the key with the effect, so a redelivery runs it again.
    ///
    /// `C` is the store's connection type (`PgConnection` or `SqliteConnection`); a
    /// mismatch is a `Configuration` error.
    pub async fn process<C, T, F>(
        &self,
        consumer: &str,
        message: &Message,
        effect: F,
    ) -> Result<InboxOutcome<T>>
    where
        C: SqlConnection,
        T: Send,
        F: for<'c> FnOnce(&'c mut C) -> BoxFuture<'c, Result<T>> + Send,
    {
        check_consumer(consumer)?;
        let mut tx = C::begin_on(&self.store).await?;
        let conn: &mut C = &mut tx;
        if !conn
            .insert_inbox_key(&self.store, consumer, message.id().as_str())
            .await?
        {
            tx.rollback()
                .await
                .map_err(|e| storage("end an inbox transaction", e))?;
            self.duplicate(consumer, message.id());
            return Ok(InboxOutcome::Duplicate);
        }
        match effect(&mut tx).await {
            Ok(value) => {
                tx.commit()
                    .await
                    .map_err(|e| storage("commit an inbox transaction", e))?;
                Ok(InboxOutcome::Applied(value))
            }
            Err(e) => {
                // Dropping the transaction would roll back too; saying so is clearer, and
                // a failed rollback only means the connection is gone (nothing committed).
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    /// Records the key in the caller's own transaction (`&mut *tx`). Returns `true` the
    /// first time (apply the effect in the same transaction, then commit), `false` for a
    /// duplicate (skip the effect).
    pub async fn record<C: SqlConnection>(
        &self,
        conn: &mut C,
        consumer: &str,
        message_id: &MessageId,
    ) -> Result<bool> {
        check_consumer(consumer)?;
        let first = conn
            .insert_inbox_key(&self.store, consumer, message_id.as_str())
            .await?;
        if !first {
            self.duplicate(consumer, message_id);
        }
        Ok(first)
    }

    fn duplicate(&self, consumer: &str, id: &MessageId) {
        tracing::debug!(consumer, message_id = %id, "duplicate delivery skipped by the inbox");
        metrics::counter!(telemetry::INBOX_DUPLICATES, "adapter" => ADAPTER, "group" => consumer.to_owned())
            .increment(1);
    }
}

fn check_consumer(consumer: &str) -> Result<()> {
    if consumer.is_empty()
        || consumer.len() > MAX_CONSUMER_NAME_LEN
        || consumer.chars().any(char::is_control)
    {
        return Err(Error::invalid(format!(
            "consumer name must be 1 to {MAX_CONSUMER_NAME_LEN} bytes without control characters"
        ))
        .with_context("adapter", ADAPTER));
    }
    Ok(())
}
