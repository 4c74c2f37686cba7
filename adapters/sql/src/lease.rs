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
