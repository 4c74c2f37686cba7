//! Every change of an outbox row's state, and the only place one happens.
//!
//! A row is born `PENDING` ([`crate::Outbox::enqueue`], `outbox.rs`) or `PREPARED`
//! ([`crate::PreparedMessages::prepare`], through the same insert). From there:
//!
//! | from | to | statement | run by |
//! |---|---|---|---|
//! | `PREPARED` | `PENDING`, due now | [`commit_prepared`] | `PreparedMessages::commit`; the checker on a `Commit` answer |
//! | `PREPARED` | `PENDING`, leased | [`commit_prepared_leased`] | the producer's own commit: its relay publishes at once |
//! | `PREPARED` | deleted | [`rollback_prepared`] | `PreparedMessages::rollback`; the checker on `Rollback`, or when checks run out with `CheckExhausted::Rollback` |
//! | `PREPARED` | `DEAD` | [`dead_prepared`] | the checker, when checks run out with `CheckExhausted::Dead` |
//! | `PENDING` | `SENT` | [`mark_sent`] | the relay after the broker's confirm, lease holder only |
//! | `PENDING` | `PENDING` later, or `DEAD` | [`mark_failed`] | the relay after a failed publish, lease holder only |
//! | `DEAD` | `PENDING`, attempts reset | [`redrive`] | `Outbox::redrive`, `redrive_all` |
//! | `PENDING`, `SENT` | `COMPLETED` or `FAILED` | [`apply_receipt`] | `Receipts` (a receipt can overtake the relay's mark-sent) |
//! | `SENT` | `PENDING`, due now | [`redeliver_overdue`] | the receipt sweep, when no receipt came in time |
//!
//! `SENT`, `COMPLETED` and `FAILED` rows are deleted by [`crate::SqlStore::cleanup`] after
//! their retention. Nothing else moves a row: relay leases (`lease.rs`) and check-back
//! leases (`checker.rs`) change an owner, a deadline and a count, never the state. Each
//! statement (`sql/transitions.rs`) names the state it leaves in its `WHERE` clause, so a transition that lost a
//! race (a check-back resolved the row first, another relay took the lease over) changes
//! nothing and says so in its result.

use std::time::Duration;

use surety_core::{MessageId, Result};

use crate::backend::{Arg, Backend, On};
use crate::entry::{EntryState, OutboxEntry, count, decode_all, millis, state};
use crate::error::storage;
use crate::lease::update_leased;
use crate::sql::transitions::Statements;
use crate::store::SqlStore;

fn statements<DB: Backend>(store: &SqlStore<DB>) -> &Statements {
    &store.sql().transitions
}

/// `PENDING` → `SENT` for confirmed rows, only where `owner` still holds the lease.
/// Returns how many were marked.
pub(crate) async fn mark_sent<DB: Backend>(
    store: &SqlStore<DB>,
    owner: &str,
    ids: &[i64],
) -> Result<u64> {
    let sql = &statements(store).mark_sent;
    update_leased(store, sql, "mark outbox rows sent", owner, ids).await
}

/// What a failed publish attempt makes of its row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Stays `PENDING`, due again after the delay.
    Retry(Duration),
    /// Attempts ran out (or can never succeed): `DEAD`.
    Dead,
}

/// A failed publish attempt of one leased row.
#[derive(Clone, Debug)]
pub(crate) struct FailedAttempt {
    pub id: i64,
    pub next: Next,
    pub error: String,
}

/// Records failed attempts (`PENDING` later, or `DEAD`), in one transaction, only where
/// `owner` holds the lease. Returns how many were recorded.
pub(crate) async fn mark_failed<DB: Backend>(
    store: &SqlStore<DB>,
    owner: &str,
    failures: &[FailedAttempt],
) -> Result<u64> {
    if failures.is_empty() {
        return Ok(0);
    }
    let sql = &statements(store).mark_failed;
    let e = |e| storage("record failed outbox attempts", e);
    let mut tx = store.begin("record failed outbox attempts").await?;
    let mut marked = 0;
    for failure in failures {
        let (next, delay) = match failure.next {
            Next::Retry(delay) => (state::PENDING, delay),
            Next::Dead => (state::DEAD, Duration::ZERO),
        };
        let args = [
            Arg::Int(failure.id),
            Arg::Text(owner),
            Arg::Text(next),
            Arg::Int(millis(delay)),
            Arg::Text(&failure.error),
        ];
        marked += DB::execute(On::Conn(&mut *tx), sql, &args)
            .await
            .map_err(e)?;
    }
    tx.commit().await.map_err(e)?;
    Ok(marked)
}

/// `DEAD` → `PENDING` with attempts reset, due now: one row by message id, or all.
/// Returns how many.
pub(crate) async fn redrive<DB: Backend>(
    store: &SqlStore<DB>,
    id: Option<&MessageId>,
) -> Result<u64> {
    let s = statements(store);
    let on = On::Pool(store.pool());
    match id {
        Some(id) => DB::execute(on, &s.redrive_one, &[Arg::Text(id.as_str())]).await,
        None => DB::execute(on, &s.redrive_all, &[]).await,
    }
    .map_err(|e| storage("re-drive dead outbox rows", e))
}

/// `PREPARED` → `PENDING`, due now. False when the row was no longer prepared (resolved
/// elsewhere).
pub(crate) async fn commit_prepared<DB: Backend>(store: &SqlStore<DB>, id: i64) -> Result<bool> {
    let sql = &statements(store).commit_prepared;
    DB::execute(On::Pool(store.pool()), sql, &[Arg::Int(id)])
        .await
        .map(|n| n == 1)
        .map_err(|e| storage("commit a prepared message", e))
}

/// `PREPARED` → `PENDING`, leased to `owner` for `lease` (and the attempt counted): the
/// committing producer's relay publishes it next. `None` when the row was no longer
/// prepared.
pub(crate) async fn commit_prepared_leased<DB: Backend>(
    store: &SqlStore<DB>,
    id: i64,
    owner: &str,
    lease: Duration,
) -> Result<Option<OutboxEntry>> {
    let sql = &statements(store).commit_prepared_leased;
    let args = [Arg::Int(id), Arg::Text(owner), Arg::Int(millis(lease))];
    let rows = DB::fetch(On::Pool(store.pool()), sql, &args)
        .await
        .map_err(|e| storage("commit a prepared message", e))?;
    Ok(decode_all::<DB>(&rows)?.pop())
}

/// Deletes a `PREPARED` row: it is never published. False when it was no longer prepared.
pub(crate) async fn rollback_prepared<DB: Backend>(store: &SqlStore<DB>, id: i64) -> Result<bool> {
    let sql = &statements(store).rollback_prepared;
    DB::execute(On::Pool(store.pool()), sql, &[Arg::Int(id)])
        .await
        .map(|n| n == 1)
        .map_err(|e| storage("roll back a prepared message", e))
}

/// `PREPARED` → `DEAD` with `error` (check-backs ran out). False when it was no longer
/// prepared.
pub(crate) async fn dead_prepared<DB: Backend>(
    store: &SqlStore<DB>,
    id: i64,
    error: &str,
) -> Result<bool> {
    let sql = &statements(store).dead_prepared;
    DB::execute(
        On::Pool(store.pool()),
        sql,
        &[Arg::Int(id), Arg::Text(error)],
    )
    .await
    .map(|n| n == 1)
    .map_err(|e| storage("mark a prepared message dead", e))
}

/// `PENDING` or `SENT` → `to` (`COMPLETED` or `FAILED`, with the consumer's `reason`), on
/// the store's pool or in a transaction (a failure's compensation joins it). Returns the
/// row when it changed; `None` for a repeated receipt or an unknown id.
pub(crate) async fn apply_receipt<DB: Backend>(
    store: &SqlStore<DB>,
    on: On<'_, DB>,
    message_id: &MessageId,
    to: EntryState,
    reason: Option<&str>,
) -> Result<Option<OutboxEntry>> {
    debug_assert!(matches!(to, EntryState::Completed | EntryState::Failed));
    let sql = &statements(store).apply_receipt;
    let args = [
        Arg::Text(message_id.as_str()),
        Arg::Text(to.as_str()),
        Arg::OptText(reason),
    ];
    let rows = DB::fetch(on, sql, &args)
        .await
        .map_err(|e| storage("record a receipt", e))?;
    Ok(decode_all::<DB>(&rows)?.pop())
}

/// `SENT` → `PENDING`, due now, for at most `limit` rows whose receipt is older than
/// `timeout`. Returns how many.
pub(crate) async fn redeliver_overdue<DB: Backend>(
    store: &SqlStore<DB>,
    timeout: Duration,
    limit: usize,
) -> Result<u64> {
    let sql = &statements(store).redeliver_overdue;
    let args = [Arg::Int(millis(timeout)), Arg::Int(count(limit.max(1)))];
    DB::execute(On::Pool(store.pool()), sql, &args)
        .await
        .map_err(|e| storage("re-deliver rows without a receipt", e))
}
