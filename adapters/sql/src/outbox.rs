//! The transactional outbox: a row is born `PENDING` in the application's transaction
//! (or `PREPARED` by `prepared.rs`); inspect rows, count them, re-drive dead ones.

use std::collections::HashMap;
use std::time::Duration;

use surety_core::{Error, Message, MessageId, Result, telemetry};

use crate::backend::{Arg, Backend, On};
use crate::entry::{Columns, EntryState, OutboxEntry, count, decode_all, millis, state};
use crate::error::{ADAPTER, is_unique_violation, storage};
use crate::store::SqlStore;
use crate::transitions;

/// The outbox of a [`SqlStore`]. Cheap to clone.
///
/// ```no_run
/// # async fn run(store: surety_sql::SqliteStore) -> surety_core::Result<()> {
/// use surety_core::Message;
/// let mut tx = store.pool().begin().await.unwrap();
/// // ... the business change, on `&mut *tx` ...
/// store.outbox().enqueue(&mut *tx, &Message::new("orders", "placed")).await?;
/// tx.commit().await.unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Outbox<DB: Backend> {
    store: SqlStore<DB>,
}

impl<DB: Backend> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Outbox {
            store: self.store.clone(),
        }
    }
}

impl<DB: Backend> Outbox<DB> {
    pub(crate) fn new(store: SqlStore<DB>) -> Self {
        Outbox { store }
    }

    /// Inserts `message` as a `PENDING` row through `conn`, the application's open
    /// transaction (`&mut *tx`): it commits or rolls back with the business change.
    ///
    /// The message is validated first (destination, headers, and the size against
    /// [`crate::StoreConfig::max_message_size`]): an invalid or oversized message is an
    /// [`ErrorKind::InvalidMessage`](surety_core::ErrorKind::InvalidMessage) error and
    /// nothing is written. A second message with the same id is refused the same way (the
    /// id is the deduplication key).
    pub async fn enqueue(&self, conn: &mut DB::Connection, message: &Message) -> Result<()> {
        self.enqueue_delayed(conn, message, Duration::ZERO).await
    }

    /// Like [`Outbox::enqueue`], but the row becomes due only after `delay`.
    pub async fn enqueue_delayed(
        &self,
        conn: &mut DB::Connection,
        message: &Message,
        delay: Duration,
    ) -> Result<()> {
        check(&self.store, message)?;
        let row = NewRow {
            state: state::PENDING,
            group: None,
            due_in: delay,
        };
        insert_row(&self.store, On::Conn(conn), message, row).await?;
        Ok(())
    }

    /// The row of one message.
    pub async fn get(&self, id: &MessageId) -> Result<Option<OutboxEntry>> {
        let sql = &self.store.sql().outbox.get;
        let rows = DB::fetch(On::Pool(self.store.pool()), sql, &[Arg::Text(id.as_str())])
            .await
            .map_err(|e| storage("read an outbox row", e))?;
        Ok(decode_all::<DB>(&rows)?.pop())
    }

    /// Rows in `state`, oldest first, after row position `after` (pass the
    /// [`OutboxEntry::position`] of the last row seen to page; 0 to start).
    pub async fn list(
        &self,
        state: EntryState,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>> {
        let sql = &self.store.sql().outbox.list_state;
        let args = [
            Arg::Text(state.as_str()),
            Arg::Int(after),
            Arg::Int(count(limit.max(1))),
        ];
        let rows = DB::fetch(On::Pool(self.store.pool()), sql, &args)
            .await
            .map_err(|e| storage("list outbox rows", e))?;
        decode_all::<DB>(&rows)
    }

    /// Dead rows (attempts used up), oldest first, each with its last error.
    pub async fn dead(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.list(EntryState::Dead, 0, limit).await
    }

    /// Puts one dead row back to `PENDING` with its attempts reset, due now. Returns
    /// whether a dead row with this id existed.
    pub async fn redrive(&self, id: &MessageId) -> Result<bool> {
        Ok(transitions::redrive(&self.store, Some(id)).await? == 1)
    }

    /// Puts every dead row back to `PENDING`. Returns how many.
    pub async fn redrive_all(&self) -> Result<u64> {
        transitions::redrive(&self.store, None).await
    }
}

/// Validates a message against the store's size limit.
pub(crate) fn check<DB: Backend>(store: &SqlStore<DB>, message: &Message) -> Result<()> {
    message
        .validate(Some(store.config().max_message_size))
        .map_err(|e| e.with_context("adapter", ADAPTER))
}

/// How a row is born.
pub(crate) struct NewRow<'a> {
    /// `PENDING` (enqueue) or `PREPARED` (a half message).
    pub state: &'static str,
    /// The producer group of a half message.
    pub group: Option<&'a str>,
    /// When it is first due (published, or checked back).
    pub due_in: Duration,
}

/// Inserts a row; returns its id. A message id already in the outbox is an
/// `InvalidMessage` error.
pub(crate) async fn insert_row<DB: Backend>(
    store: &SqlStore<DB>,
    on: On<'_, DB>,
    message: &Message,
    row: NewRow<'_>,
) -> Result<i64> {
    let headers = serde_json::to_string(message.headers())
        .map_err(|e| Error::invalid("headers do not encode as JSON").with_source(e))?;
    let args = [
        Arg::Text(message.id().as_str()),
        Arg::Text(message.destination()),
        Arg::OptText(message.key()),
        Arg::Text(&headers),
        Arg::Bytes(message.payload().as_ref()),
        Arg::Int(i64::try_from(message.created_at_millis()).unwrap_or(i64::MAX)),
        Arg::Text(row.state),
        Arg::OptText(row.group),
        Arg::Int(millis(row.due_in)),
    ];
    let rows = DB::fetch(on, &store.sql().outbox.insert, &args)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::invalid(format!(
                    "a message with id {} is already in the outbox",
                    message.id()
                ))
                .with_context("message_id", message.id().as_str())
                .with_source(e)
            } else {
                storage("enqueue a message", e).with_context("message_id", message.id().as_str())
            }
        })?;
    let row = rows
        .first()
        .ok_or_else(|| crate::error::corrupt("the insert returned no id"))?;
    Columns::<DB>::of(row, "read the new row's id").int(0)
}

impl<DB: Backend> SqlStore<DB> {
    /// Rows per state (states without rows are absent). Also sets the
    /// [`telemetry::OUTBOX_DEPTH`] gauge.
    pub async fn counts(&self) -> Result<HashMap<EntryState, u64>> {
        let rows = DB::fetch(On::Pool(self.pool()), &self.sql().outbox.counts, &[])
            .await
            .map_err(|e| storage("count outbox rows", e))?;
        let mut counts = HashMap::new();
        for row in &rows {
            let c = Columns::<DB>::of(row, "count outbox rows");
            let state = EntryState::parse(&c.text(0)?)?;
            counts.insert(state, c.int(1)?.max(0) as u64);
        }
        for s in EntryState::ALL {
            let n = counts.get(&s).copied().unwrap_or(0);
            metrics::gauge!(telemetry::OUTBOX_DEPTH, "adapter" => ADAPTER, "state" => s.as_str())
                .set(n as f64);
        }
        Ok(counts)
    }

    /// How long the oldest due pending row has waited (zero when none is due). Also sets
    /// the [`telemetry::RELAY_LAG_SECONDS`] gauge.
    pub async fn lag(&self) -> Result<Duration> {
        let rows = DB::fetch(On::Pool(self.pool()), &self.sql().outbox.lag, &[])
            .await
            .map_err(|e| storage("measure relay lag", e))?;
        let ms = match rows.first() {
            Some(row) => Columns::<DB>::of(row, "measure relay lag").opt_int(0)?,
            None => None,
        };
        let lag = Duration::from_millis(ms.unwrap_or(0).max(0) as u64);
        metrics::gauge!(telemetry::RELAY_LAG_SECONDS, "adapter" => ADAPTER).set(lag.as_secs_f64());
        Ok(lag)
    }
}
