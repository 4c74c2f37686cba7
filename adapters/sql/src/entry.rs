//! An outbox row as the crate hands it out: its states, its fields, and how a stored row
//! decodes on either database.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use surety_core::{Message, MessageId, Result};

use crate::backend::Backend;
use crate::error::{corrupt, storage};

/// The columns every statement that returns outbox rows selects, in the order
/// [`decode_all`] reads them.
pub(crate) const COLUMNS: &str = "id, message_id, destination, msg_key, headers, payload, \
    created_at_ms, state, producer_group, attempts, checks, due_at, last_error, enqueued_at, \
    updated_at";

/// The names stored in the `state` column.
pub(crate) mod state {
    pub const PREPARED: &str = "PREPARED";
    pub const PENDING: &str = "PENDING";
    pub const SENT: &str = "SENT";
    pub const DEAD: &str = "DEAD";
    pub const COMPLETED: &str = "COMPLETED";
    pub const FAILED: &str = "FAILED";
}

/// Where an outbox row is in its life (the allowed moves: `transitions.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EntryState {
    /// A half message: stored, invisible, waiting for its local transaction or check-back.
    Prepared,
    /// Committed and waiting to be published (or being published under a lease).
    Pending,
    /// Published with confirm.
    Sent,
    /// Attempts (or check-backs) ran out: listed for an operator, re-drivable.
    Dead,
    /// The consumer's receipt said it was processed (receipts only).
    Completed,
    /// The consumer's receipt reported a business failure and the producer compensated
    /// (receipts only); `last_error` holds the reason.
    Failed,
}

impl EntryState {
    /// The name stored in the `state` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            EntryState::Prepared => state::PREPARED,
            EntryState::Pending => state::PENDING,
            EntryState::Sent => state::SENT,
            EntryState::Dead => state::DEAD,
            EntryState::Completed => state::COMPLETED,
            EntryState::Failed => state::FAILED,
        }
    }

    /// Every state, for reports.
    pub const ALL: [EntryState; 6] = [
        EntryState::Prepared,
        EntryState::Pending,
        EntryState::Sent,
        EntryState::Dead,
        EntryState::Completed,
        EntryState::Failed,
    ];

    pub(crate) fn parse(text: &str) -> Result<Self> {
        EntryState::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| corrupt(format!("unknown outbox state {text:?}")))
    }
}

/// One outbox row, as stored.
#[derive(Clone, Debug)]
pub struct OutboxEntry {
    pub(crate) id: i64,
    /// The message, exactly as enqueued.
    pub message: Message,
    /// Its state.
    pub state: EntryState,
    /// The producer group of a half message.
    pub producer_group: Option<String>,
    /// Publish attempts so far (an attempt counts when a relay leases the row).
    pub attempts: u32,
    /// Check-backs asked so far (half messages).
    pub checks: u32,
    /// The last publish error, or why the row is dead.
    pub last_error: Option<String>,
    /// When the row is next looked at (next attempt, next check-back).
    pub due_at: SystemTime,
    /// When it was written.
    pub enqueued_at: SystemTime,
    /// When it last changed.
    pub updated_at: SystemTime,
}

impl OutboxEntry {
    /// The row's position in the table (its primary key), for paging with
    /// [`crate::Outbox::list`]. Positions grow with insertion but commit order may differ.
    pub fn position(&self) -> i64 {
        self.id
    }
}

/// A time stored as milliseconds since the Unix epoch.
pub(crate) fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// A duration as the milliseconds the statements bind.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A count or limit as a bound integer.
pub(crate) fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A JSON array of `items`, bound as one parameter by the batch statements.
pub(crate) fn json_list<T: Into<serde_json::Value>>(items: impl IntoIterator<Item = T>) -> String {
    serde_json::Value::Array(items.into_iter().map(Into::into).collect()).to_string()
}

/// Reads the columns of one row, naming the column in errors.
pub(crate) struct Columns<'r, DB: Backend> {
    row: &'r DB::Row,
    what: &'static str,
}

impl<'r, DB: Backend> Columns<'r, DB> {
    pub(crate) fn of(row: &'r DB::Row, what: &'static str) -> Self {
        Columns { row, what }
    }

    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        DB::int(self.row, i).map_err(|e| storage(self.what, e))
    }

    pub(crate) fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?.ok_or_else(|| self.null(i))
    }

    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>> {
        DB::text(self.row, i).map_err(|e| storage(self.what, e))
    }

    pub(crate) fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?.ok_or_else(|| self.null(i))
    }

    pub(crate) fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        DB::bytes(self.row, i)
            .map_err(|e| storage(self.what, e))?
            .ok_or_else(|| self.null(i))
    }

    fn null(&self, i: usize) -> surety_core::Error {
        corrupt(format!("{}: column {i} is NULL", self.what))
    }
}

/// Decodes a row selected with the `{columns}` list.
fn decode_entry<DB: Backend>(row: &DB::Row) -> Result<OutboxEntry> {
    let c = Columns::<DB>::of(row, "decode outbox row");
    let id = c.int(0)?;
    let message_id = c.text(1)?;
    let id_text = message_id.clone();
    let message_id = MessageId::parse(message_id)
        .map_err(|e| corrupt(format!("outbox row {id} has a bad message id")).with_source(e))?;
    let headers: BTreeMap<String, String> = serde_json::from_str(&c.text(4)?).map_err(|e| {
        corrupt(format!(
            "outbox row {id} has headers that are not a JSON object"
        ))
        .with_context("message_id", id_text)
        .with_source(e)
    })?;
    let mut message = Message::new(c.text(2)?, c.bytes(5)?)
        .with_id(message_id)
        .with_created_at(at(c.int(6)?));
    if let Some(key) = c.opt_text(3)? {
        message = message.with_key(key);
    }
    *message.headers_mut() = headers;
    Ok(OutboxEntry {
        id,
        message,
        state: EntryState::parse(&c.text(7)?)?,
        producer_group: c.opt_text(8)?,
        attempts: u32::try_from(c.int(9)?).unwrap_or(u32::MAX),
        checks: u32::try_from(c.int(10)?).unwrap_or(u32::MAX),
        due_at: at(c.int(11)?),
        last_error: c.opt_text(12)?,
        enqueued_at: at(c.int(13)?),
        updated_at: at(c.int(14)?),
    })
}

/// Decodes rows selected with the `{columns}` list, in enqueue order: `UPDATE ...
/// RETURNING` gives rows in no promised order, and a batch is published in enqueue order.
pub(crate) fn decode_all<DB: Backend>(rows: &[DB::Row]) -> Result<Vec<OutboxEntry>> {
    let mut entries = rows
        .iter()
        .map(decode_entry::<DB>)
        .collect::<Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.id);
    Ok(entries)
}
