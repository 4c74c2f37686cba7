//! The audit of dead-letter re-drives: who re-drove which message from where to where,
//! and when. Written by `surety dlq redrive` after the broker confirmed the publish.

use std::time::SystemTime;

use surety_core::Result;

use crate::backend::{Arg, Backend, On};
use crate::entry::{Columns, at, count};
use crate::error::storage;
use crate::store::SqlStore;

/// One re-drive to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedriveAudit {
    /// Who did it (the operator's name).
    pub actor: String,
    /// The broker adapter (`rabbitmq`, `kafka`, ...).
    pub adapter: String,
    /// The re-driven message's id.
    pub message_id: String,
    /// The dead-letter destination it was taken from.
    pub from_destination: String,
    /// The destination it was published to.
    pub to_destination: String,
    /// The consumer group whose dead letter it was.
    pub group: String,
}

/// A stored audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// Its position in the table (primary key), for paging.
    pub position: i64,
    /// What was done.
    pub entry: RedriveAudit,
    /// When it was recorded (database clock).
    pub redriven_at: SystemTime,
}

/// The re-drive audit table of a [`SqlStore`] ([`crate::TableNames::audit`], created by
/// [`SqlStore::migrate`]). Cheap to clone.
#[derive(Debug)]
pub struct DlqAudit<DB: Backend> {
    store: SqlStore<DB>,
}

impl<DB: Backend> Clone for DlqAudit<DB> {
    fn clone(&self) -> Self {
        DlqAudit {
            store: self.store.clone(),
        }
    }
}

impl<DB: Backend> DlqAudit<DB> {
    pub(crate) fn new(store: SqlStore<DB>) -> Self {
        DlqAudit { store }
    }

    /// Appends one record (every value a bound parameter); returns it as stored.
    pub async fn record(&self, entry: &RedriveAudit) -> Result<AuditRecord> {
        let what = "record a dead-letter re-drive";
        let args = [
            Arg::Text(&entry.actor),
            Arg::Text(&entry.adapter),
            Arg::Text(&entry.message_id),
            Arg::Text(&entry.from_destination),
            Arg::Text(&entry.to_destination),
            Arg::Text(&entry.group),
        ];
        let rows = DB::fetch(
            On::Pool(self.store.pool()),
            &self.store.sql().audit.insert,
            &args,
        )
        .await
        .map_err(|e| storage(what, e))?;
        let row = rows
            .first()
            .ok_or_else(|| crate::error::corrupt("the audit insert returned no row"))?;
        let c = Columns::<DB>::of(row, what);
        Ok(AuditRecord {
            position: c.int(0)?,
            entry: entry.clone(),
            redriven_at: at(c.int(1)?),
        })
    }

    /// Up to `limit` records after position `after`, oldest first.
    pub async fn list(&self, after: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        let what = "list dead-letter re-drives";
        let args = [Arg::Int(after), Arg::Int(count(limit))];
        let rows = DB::fetch(
            On::Pool(self.store.pool()),
            &self.store.sql().audit.list,
            &args,
        )
        .await
        .map_err(|e| storage(what, e))?;
        rows.iter()
            .map(|row| {
                let c = Columns::<DB>::of(row, what);
                Ok(AuditRecord {
                    position: c.int(0)?,
                    entry: RedriveAudit {
                        actor: c.text(1)?,
                        adapter: c.text(2)?,
                        message_id: c.text(3)?,
                        from_destination: c.text(4)?,
                        to_destination: c.text(5)?,
                        group: c.text(6)?,
                    },
                    redriven_at: at(c.int(7)?),
                })
            })
            .collect()
    }
}
