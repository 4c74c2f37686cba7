//! The audit of dead-letter re-drives: who re-drove which message from where to where,
//! and when. Written by `surety dlq redrive` after the broker confirmed the publish.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;
use surety_core::Result;

use crate::error::storage;
use crate::store::{SqlStore, with_pool};

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
#[derive(Clone, Debug)]
pub struct DlqAudit {
    store: SqlStore,
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

impl DlqAudit {
    pub(crate) fn new(store: SqlStore) -> Self {
        DlqAudit { store }
    }

    /// Appends one record (every value a bound parameter); returns it as stored.
    pub async fn record(&self, entry: &RedriveAudit) -> Result<AuditRecord> {
        let sql = &self.store.inner.sql;
        let e = |e| storage("record a dead-letter re-drive", e);
        let (position, ms): (i64, i64) = with_pool!(&self.store.inner.pool, p => {
            let row = sqlx::query(sql.audit_insert.clone())
                .bind(&entry.actor)
                .bind(&entry.adapter)
                .bind(&entry.message_id)
                .bind(&entry.from_destination)
                .bind(&entry.to_destination)
                .bind(&entry.group)
                .fetch_one(p)
                .await
                .map_err(e)?;
            (row.try_get(0).map_err(e)?, row.try_get(1).map_err(e)?)
        });
        Ok(AuditRecord {
            position,
            entry: entry.clone(),
            redriven_at: at(ms),
        })
    }

    /// Up to `limit` records after position `after`, oldest first.
    pub async fn list(&self, after: i64, limit: usize) -> Result<Vec<AuditRecord>> {
        let sql = &self.store.inner.sql;
        let e = |e| storage("list dead-letter re-drives", e);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        type Raw = (i64, String, String, String, String, String, String, i64);
        let rows: Vec<Raw> = with_pool!(&self.store.inner.pool, p => {
            let rows = sqlx::query(sql.audit_list.clone())
                .bind(after)
                .bind(limit)
                .fetch_all(p)
                .await
                .map_err(e)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                out.push((
                    r.try_get(0).map_err(e)?,
                    r.try_get(1).map_err(e)?,
                    r.try_get(2).map_err(e)?,
                    r.try_get(3).map_err(e)?,
                    r.try_get(4).map_err(e)?,
                    r.try_get(5).map_err(e)?,
                    r.try_get(6).map_err(e)?,
                    r.try_get(7).map_err(e)?,
                ));
            }
            out
        });
        Ok(rows
            .into_iter()
            .map(
                |(position, actor, adapter, message_id, from, to, group, ms)| AuditRecord {
                    position,
                    entry: RedriveAudit {
                        actor,
                        adapter,
                        message_id,
                        from_destination: from,
                        to_destination: to,
                        group,
                    },
                    redriven_at: at(ms),
                },
            )
            .collect())
    }
}
