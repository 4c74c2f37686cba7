//! Prepared (half) messages for brokers without native ones: a row born `PREPARED`,
//! invisible to the relay, then committed or rolled back (`transitions.rs`). The checker
//! (`checker.rs`) resolves rows left prepared; `transactional.rs` puts both behind the
//! half-message contract.

use std::time::Duration;

use surety_core::{Error, ErrorKind, Message, Result};

use crate::backend::{Backend, On};
use crate::entry::state;
use crate::error::{ADAPTER, storage};
use crate::outbox::{NewRow, check, insert_row};
use crate::store::SqlStore;
use crate::transitions;

/// The row of a prepared message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PreparedId(pub(crate) i64);

/// Prepared messages of a [`SqlStore`]. Cheap to clone.
#[derive(Debug)]
pub struct PreparedMessages<DB: Backend> {
    pub(crate) store: SqlStore<DB>,
}

impl<DB: Backend> Clone for PreparedMessages<DB> {
    fn clone(&self) -> Self {
        PreparedMessages {
            store: self.store.clone(),
        }
    }
}

impl<DB: Backend> PreparedMessages<DB> {
    pub(crate) fn new(store: SqlStore<DB>) -> Self {
        PreparedMessages { store }
    }

    /// Stores `message` as `PREPARED` for producer group `group`, committed on the store's
    /// own pool before the caller's local transaction starts, invisible to the relay. Its
    /// first check-back is due after `check_after`.
    pub async fn prepare(
        &self,
        group: &str,
        message: &Message,
        check_after: Duration,
    ) -> Result<PreparedId> {
        check_group(group)?;
        check(&self.store, message)?;
        let mut conn = self
            .store
            .pool()
            .acquire()
            .await
            .map_err(|e| storage("prepare a message", e))?;
        let row = NewRow {
            state: state::PREPARED,
            group: Some(group),
            due_in: check_after,
        };
        insert_row(&self.store, On::Conn(&mut *conn), message, row)
            .await
            .map(PreparedId)
    }

    /// PREPARED → PENDING: the relay publishes it. `false` when the row was no longer
    /// prepared (already resolved by a check-back).
    pub async fn commit(&self, id: PreparedId) -> Result<bool> {
        transitions::commit_prepared(&self.store, id.0).await
    }

    /// Deletes the prepared row: it is never published. `false` when it was no longer
    /// prepared.
    pub async fn rollback(&self, id: PreparedId) -> Result<bool> {
        transitions::rollback_prepared(&self.store, id.0).await
    }
}

/// Checks a producer group's name: 1 to 255 bytes without control characters.
pub(crate) fn check_group(group: &str) -> Result<()> {
    if group.is_empty() || group.len() > 255 || group.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorKind::Configuration,
            "producer group must be 1 to 255 bytes without control characters",
        )
        .with_context("adapter", ADAPTER));
    }
    Ok(())
}
