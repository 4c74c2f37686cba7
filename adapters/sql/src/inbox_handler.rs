//! The inbox as a handler decorator: an effect on the consumer's database becomes a
//! subscription's [`Handler`] that applies it once per message id, without the
//! application wiring the transaction, the key and the acknowledgement itself.

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use surety_core::{Delivery, ErrorKind, Handler, HandlerError, Outcome, Result};

use crate::backend::Backend;
use crate::inbox::{Inbox, InboxOutcome, check_consumer, finish};
use crate::store::SqlStore;

/// Called with each delivery's outcome once it is settled in the database.
type Observer<T> = Box<dyn Fn(&Delivery, &InboxOutcome<T>) + Send + Sync>;

/// A [`Handler`] that runs an effect through the inbox: for each delivery it opens a
/// transaction on the store's pool, records `(consumer, message id)`, runs the effect on
/// the same transaction and commits both, then acks. Built by [`Inbox::handler`].
///
/// - A duplicate (the key is already there) skips the effect, is counted in
///   `surety_inbox_duplicates_total` and acked.
/// - An error from the effect rolls back the key with the effect's writes, so the retry
///   applies it: it is a handler failure, retried under the subscription's policy. An
///   [`ErrorKind::InvalidMessage`] error (a message no retry can fix, e.g. a payload
///   that does not decode) is rejected instead: dead-lettered at once with its reason.
/// - A database error (begin, key, commit) is a failure too, retried the same way.
pub struct InboxHandler<DB: Backend, T, F> {
    inbox: Inbox<DB>,
    consumer: Arc<str>,
    effect: F,
    observer: Option<Observer<T>>,
}

impl<DB: Backend, T, F> std::fmt::Debug for InboxHandler<DB, T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxHandler")
            .field("consumer", &self.consumer)
            .field("store", &self.inbox.store)
            .finish()
    }
}

impl<DB: Backend> Inbox<DB> {
    /// A subscription's handler that applies `effect` once per message id for consumer
    /// `consumer` (the inbox key's first half: one name per consumer group and effect).
    /// The effect receives the delivery and the open transaction (`&mut *tx`); what it
    /// writes there commits with the key.
    ///
    /// ```no_run
    /// # async fn run(store: surety_sql::PgStore, broker: std::sync::Arc<dyn surety_core::Broker>) -> surety_core::Result<()> {
    /// use std::sync::Arc;
    /// use surety_core::{Delivery, Error, ErrorKind, Subscription};
    /// use surety_sql::{Inbox, sqlx};
    ///
    /// let cart = Inbox::handler(&store, "cart", |delivery: &Delivery, tx: &mut sqlx::PgConnection| {
    ///     Box::pin(async move {
    ///         let (_, customer): (i64, String) = delivery.message.decode_json()?;
    ///         sqlx::query("DELETE FROM cart_items WHERE customer = $1")
    ///             .bind(customer)
    ///             .execute(&mut *tx)
    ///             .await
    ///             .map_err(|e| Error::new(ErrorKind::Storage, "clear the cart").with_source(e))?;
    ///         Ok(())
    ///     })
    /// })?;
    /// broker.subscriber().await?.subscribe(Subscription::new("orders", "cart"), Arc::new(cart)).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A consumer name longer than [`crate::MAX_CONSUMER_NAME_LEN`] or with control
    /// characters is an `InvalidMessage` error here, before any delivery.
    pub fn handler<T, F>(
        store: &SqlStore<DB>,
        consumer: &str,
        effect: F,
    ) -> Result<InboxHandler<DB, T, F>>
    where
        F: for<'a> Fn(&'a Delivery, &'a mut DB::Connection) -> BoxFuture<'a, Result<T>>
            + Send
            + Sync,
    {
        check_consumer(consumer)?;
        Ok(InboxHandler {
            inbox: store.inbox(),
            consumer: consumer.into(),
            effect,
            observer: None,
        })
    }
}

impl<DB, T, F> InboxHandler<DB, T, F>
where
    DB: Backend,
    T: Send,
    F: for<'a> Fn(&'a Delivery, &'a mut DB::Connection) -> BoxFuture<'a, Result<T>> + Send + Sync,
{
    /// Calls `observer` with each delivery's outcome once it is settled in the database:
    /// [`InboxOutcome::Applied`] with the effect's value after the commit, or
    /// [`InboxOutcome::Duplicate`]. Not called for a delivery that failed (it is retried)
    /// or was rejected. Replaces an earlier observer.
    pub fn on_outcome(
        mut self,
        observer: impl Fn(&Delivery, &InboxOutcome<T>) + Send + Sync + 'static,
    ) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Applies the effect to one delivery once per message id.
    async fn apply(&self, delivery: &Delivery) -> Result<InboxOutcome<T>> {
        let id = delivery.message.id();
        let Some(mut tx) = self.inbox.begin_with_key(&self.consumer, id).await? else {
            return Ok(InboxOutcome::Duplicate);
        };
        let result = (self.effect)(delivery, &mut tx).await;
        finish(tx, result).await.map(InboxOutcome::Applied)
    }
}

#[async_trait]
impl<DB, T, F> Handler for InboxHandler<DB, T, F>
where
    DB: Backend,
    T: Send,
    F: for<'a> Fn(&'a Delivery, &'a mut DB::Connection) -> BoxFuture<'a, Result<T>> + Send + Sync,
{
    async fn handle(&self, delivery: &Delivery) -> std::result::Result<Outcome, HandlerError> {
        match self.apply(delivery).await {
            Ok(outcome) => {
                if let Some(observer) = &self.observer {
                    observer(delivery, &outcome);
                }
                Ok(Outcome::Ack)
            }
            Err(e) if e.kind() == ErrorKind::InvalidMessage => Ok(Outcome::reject(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }
}
