//! Relay leases (`lease.rs`): claim due rows or named rows for an owner, and release
//! them. A lease never changes a row's state.

use sqlx::SqlStr;

use super::Render;

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
    pub(crate) claim_ids: SqlStr,
    pub(crate) release: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &Render<'_>) -> Self {
        Statements {
            claim_due: r.sql(CLAIM_DUE),
            claim_ids: r.sql(CLAIM_IDS),
            release: r.sql(RELEASE),
        }
    }
}
