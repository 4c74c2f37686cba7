//! The idempotent consumer: one key per `(consumer_name, message_id)`, written in the
//! same transaction as the effect. [`Inbox::process`] runs one effect;
//! [`Inbox::handler`] (`inbox_handler.rs`) makes a subscription's handler of one.

use futures::future::BoxFuture;
use sqlx::Transaction;
use surety_core::{Error, Message, MessageId, Result, telemetry};

use crate::backend::{Arg, Backend, On};
use crate::error::{ADAPTER, storage};
use crate::store::SqlStore;

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
/// # async fn run(store: surety_sql::SqliteStore, message: surety_core::Message) -> surety_core::Result<()> {
/// let outcome = store
///     .inbox()
///     .process("cart", &message, |tx| {
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
#[derive(Debug)]
pub struct Inbox<DB: Backend> {
    pub(crate) store: SqlStore<DB>,
}

impl<DB: Backend> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Inbox {
            store: self.store.clone(),
        }
    }
}

impl<DB: Backend> Inbox<DB> {
    pub(crate) fn new(store: SqlStore<DB>) -> Self {
        Inbox { store }
    }

    /// Runs `effect` once per `(consumer, message id)`: opens a transaction on the store's
    /// pool, records the key, runs `effect` on the same transaction and commits both. A key
    /// already present skips the effect ([`InboxOutcome::Duplicate`]). An error from
    /// `effect` rolls back the key with the effect, so a redelivery runs it again.
    pub async fn process<T, F>(
        &self,
        consumer: &str,
        message: &Message,
        effect: F,
    ) -> Result<InboxOutcome<T>>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut DB::Connection) -> BoxFuture<'c, Result<T>> + Send,
    {
        check_consumer(consumer)?;
        let Some(mut tx) = self.begin_with_key(consumer, message.id()).await? else {
            return Ok(InboxOutcome::Duplicate);
        };
        let result = effect(&mut tx).await;
        finish(tx, result).await.map(InboxOutcome::Applied)
    }

    /// Opens a transaction on the store's pool and records the key in it; `None` (the
    /// transaction rolled back, the duplicate counted) when the key was already there.
    pub(crate) async fn begin_with_key(
        &self,
        consumer: &str,
        id: &MessageId,
    ) -> Result<Option<Transaction<'static, DB>>> {
        let mut tx = self.store.begin("begin an inbox transaction").await?;
        if self.insert_key(&mut tx, consumer, id).await? {
            return Ok(Some(tx));
        }
        tx.rollback()
            .await
            .map_err(|e| storage("end an inbox transaction", e))?;
        self.duplicate(consumer, id);
        Ok(None)
    }

    /// Records the key in the caller's own transaction (`&mut *tx`). Returns `true` the
    /// first time (apply the effect in the same transaction, then commit), `false` for a
    /// duplicate (skip the effect).
    pub async fn record(
        &self,
        conn: &mut DB::Connection,
        consumer: &str,
        message_id: &MessageId,
    ) -> Result<bool> {
        check_consumer(consumer)?;
        let first = self.insert_key(conn, consumer, message_id).await?;
        if !first {
            self.duplicate(consumer, message_id);
        }
        Ok(first)
    }

    /// Inserts the key through `conn`; false when it was already there.
    async fn insert_key(
        &self,
        conn: &mut DB::Connection,
        consumer: &str,
        message_id: &MessageId,
    ) -> Result<bool> {
        let args = [Arg::Text(consumer), Arg::Text(message_id.as_str())];
        DB::execute(On::Conn(conn), &self.store.sql().inbox.insert, &args)
            .await
            .map(|n| n == 1)
            .map_err(|e| storage("record an inbox key", e))
    }

    /// Logs and counts a duplicate in `surety_inbox_duplicates_total`.
    pub(crate) fn duplicate(&self, consumer: &str, id: &MessageId) {
        tracing::debug!(consumer, message_id = %id, "duplicate delivery skipped by the inbox");
        metrics::counter!(telemetry::INBOX_DUPLICATES, "adapter" => ADAPTER, "group" => consumer.to_owned())
            .increment(1);
    }
}

/// Commits the key with the effect's writes when the effect succeeded; rolls both back
/// when it failed, so a redelivery runs it again.
pub(crate) async fn finish<DB: Backend, T>(
    tx: Transaction<'static, DB>,
    result: Result<T>,
) -> Result<T> {
    match result {
        Ok(value) => {
            tx.commit()
                .await
                .map_err(|e| storage("commit an inbox transaction", e))?;
            Ok(value)
        }
        Err(e) => {
            // Dropping the transaction would roll back too; saying so is clearer, and a
            // failed rollback only means the connection is gone (nothing committed).
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// Checks a consumer name: 1 to [`MAX_CONSUMER_NAME_LEN`] bytes without control characters.
pub(crate) fn check_consumer(consumer: &str) -> Result<()> {
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
