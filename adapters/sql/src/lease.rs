//! Relay leases on `PENDING` rows: who may publish a row right now. A lease never changes
//! a row's state (that is `transitions.rs`); it names an owner until a deadline and counts
//! the attempt up front, so an attempt that crashes the relay still counts.
//!
//! On PostgreSQL `FOR UPDATE SKIP LOCKED` lets several relays lease disjoint batches at
//! once; a lease past its deadline is free for any relay (a crashed relay's rows are taken
//! over). On SQLite the single writer serialises leases.

use std::time::Duration;

use sqlx::SqlStr;
use surety_core::{MessageId, Result};

use crate::backend::{Arg, Backend, On};
use crate::entry::{OutboxEntry, count, decode_all, json_list, millis};
use crate::error::storage;
use crate::store::SqlStore;

/// Leases due rows: `$1` owner, `$2` lease ms, `$3` limit.
const CLAIM_DUE: &str = "WITH due AS (
        SELECT id FROM {outbox}
        WHERE state = 'PENDING' AND due_at <= {now}
          AND (lease_until IS NULL OR lease_until <= {now})
        ORDER BY due_at, id
        LIMIT $3
        {skip_locked}
    )
    UPDATE {outbox}
    SET lease_owner = $1, lease_until = {now} + $2, attempts = attempts + 1, updated_at = {now}
    WHERE id IN (SELECT id FROM due)
    RETURNING {columns}";

/// Leases pending rows by message id for the fast path: `$1` JSON array of message ids,
/// `$2` owner, `$3` lease ms.
const CLAIM_IDS: &str = "UPDATE {outbox}
    SET lease_owner = $2, lease_until = {now} + $3, attempts = attempts + 1, updated_at = {now}
    WHERE message_id IN {texts_in_p1} AND state = 'PENDING' AND due_at <= {now}
      AND (lease_until IS NULL OR lease_until <= {now})
    RETURNING {columns}";

/// `$1` JSON array of row ids, `$2` owner. Hands leased rows back unpublished: the lease
/// and the attempt it counted are undone.
const RELEASE: &str = "UPDATE {outbox}
    SET lease_owner = NULL, lease_until = NULL, attempts = attempts - 1, updated_at = {now}
    WHERE id IN {ids_in_p1} AND lease_owner = $2 AND state = 'PENDING'";

/// The lease statements.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) claim_due: SqlStr,
    claim_ids: SqlStr,
    release: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &crate::sql::Render<'_>) -> Self {
        Statements {
            claim_due: r.sql(CLAIM_DUE),
            claim_ids: r.sql(CLAIM_IDS),
            release: r.sql(RELEASE),
        }
    }
}

/// Leases up to `limit` due rows to `owner` for `lease`.
pub(crate) async fn claim_due<DB: Backend>(
    store: &SqlStore<DB>,
    owner: &str,
    lease: Duration,
    limit: usize,
) -> Result<Vec<OutboxEntry>> {
    let args = [
        Arg::Text(owner),
        Arg::Int(millis(lease)),
        Arg::Int(count(limit.max(1))),
    ];
    let rows = DB::fetch(On::Pool(store.pool()), &store.sql().lease.claim_due, &args)
        .await
        .map_err(|e| storage("lease due outbox rows", e))?;
    decode_all::<DB>(&rows)
}

/// Leases these messages' rows to `owner` if they are due and free (the fast path).
pub(crate) async fn claim_ids<DB: Backend>(
    store: &SqlStore<DB>,
    owner: &str,
    lease: Duration,
    ids: &[MessageId],
) -> Result<Vec<OutboxEntry>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids = json_list(ids.iter().map(|id| id.as_str()));
    let args = [Arg::Text(&ids), Arg::Text(owner), Arg::Int(millis(lease))];
    let rows = DB::fetch(On::Pool(store.pool()), &store.sql().lease.claim_ids, &args)
        .await
        .map_err(|e| storage("lease outbox rows", e))?;
    decode_all::<DB>(&rows)
}

/// Hands rows `owner` leased but did not publish back to every relay. Returns how many it
/// still held.
pub(crate) async fn release<DB: Backend>(
    store: &SqlStore<DB>,
    owner: &str,
    ids: &[i64],
) -> Result<u64> {
    let sql = &store.sql().lease.release;
    update_leased(store, sql, "hand back leased outbox rows", owner, ids).await
}

/// Runs a statement over rows by id (`$1`, a JSON list) that `owner` (`$2`) leases: one
/// statement per batch, not a round trip per row. Returns the rows it changed.
pub(crate) async fn update_leased<DB: Backend>(
    store: &SqlStore<DB>,
    sql: &SqlStr,
    operation: &'static str,
    owner: &str,
    ids: &[i64],
) -> Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let ids = json_list(ids.iter().copied());
    DB::execute(
        On::Pool(store.pool()),
        sql,
        &[Arg::Text(&ids), Arg::Text(owner)],
    )
    .await
    .map_err(|e| storage(operation, e))
}
