//! The transactional outbox: enqueue in the application's transaction; inspect and
//! re-drive rows.

use surety_core::{Message, MessageId, Result};

use crate::error::ADAPTER;
use crate::sql::state;
use crate::store::{EntryState, OutboxEntry, SqlConnection, SqlStore, insert_row};

/// The outbox of a [`SqlStore`]. Cheap to clone.
///
/// ```no_run
/// # async fn run(store: surety_sql::SqlStore) -> surety_core::Result<()> {
/// use surety_core::Message;
/// let pool = store.sqlite_pool().unwrap();
/// let mut tx = pool.begin().await.unwrap();
/// // ... the business change, on `&mut *tx` ...
/// store.outbox().enqueue(&mut *tx, &Message::new("orders", "placed")).await?;
/// tx.commit().await.unwrap();
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    store: SqlStore,
}

impl Outbox {
    pub(crate) fn new(store: SqlStore) -> Self {
        Outbox { store }
    }

    /// Inserts `message` as a `PENDING` row through `conn`, the application's open
    /// transaction (`&mut *tx`): it commits or rolls back with the business change.
    ///
    /// The message is validated first (destination, headers, and the size against
    /// [`crate::StoreConfig::max_message_size`]): an invalid or oversized message is an
    /// [`ErrorKind::InvalidMessage`](surety_core::ErrorKind::InvalidMessage) error and nothing is written. A second message with
    /// the same id is refused the same way (the id is the deduplication key).
    pub async fn enqueue<C: SqlConnection>(&self, conn: &mut C, message: &Message) -> Result<()> {
        self.check(message)?;
        insert_row(conn, &self.store, message, state::PENDING, None, 0).await?;
        Ok(())
    }

    /// Like [`Outbox::enqueue`], but the row becomes due only after `delay`.
    pub async fn enqueue_delayed<C: SqlConnection>(
        &self,
        conn: &mut C,
        message: &Message,
        delay: std::time::Duration,
    ) -> Result<()> {
        self.check(message)?;
        let delay = crate::store::millis(delay);
        insert_row(conn, &self.store, message, state::PENDING, None, delay).await?;
        Ok(())
    }

    fn check(&self, message: &Message) -> Result<()> {
        message
            .validate(Some(self.store.config().max_message_size))
            .map_err(|e| e.with_context("adapter", ADAPTER))
    }

    /// The row of one message.
    pub async fn get(&self, id: &MessageId) -> Result<Option<OutboxEntry>> {
        self.store.get(id).await
    }

    /// Rows in `state`, oldest first, after row position `after` (pass the
    /// [`OutboxEntry::position`] of the last row seen to page; 0 to start).
    pub async fn list(
        &self,
        state: EntryState,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        self.store.list(state, after, limit).await
    }

    /// Dead rows (attempts used up), oldest first, each with its last error.
    pub async fn dead(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.store.list(EntryState::Dead, 0, limit).await
    }

    /// Puts one dead row back to `PENDING` with its attempts reset, due now. Returns
    /// whether a dead row with this id existed.
    pub async fn redrive(&self, id: &MessageId) -> Result<bool> {
        Ok(self.store.redrive(Some(id)).await? == 1)
    }

    /// Puts every dead row back to `PENDING`. Returns how many.
    pub async fn redrive_all(&self) -> Result<u64> {
        self.store.redrive(None).await
    }
}
