//! The statement of every state change (`transitions.rs` runs them, and nothing else
//! does). Each names the state it leaves in its `WHERE` clause, so a transition that lost
//! a race changes nothing.

use sqlx::SqlStr;

use super::Render;

/// `$1` JSON array of row ids, `$2` owner. Only the lease holder marks a row sent. One
/// statement per batch: a statement per row cost the relay a round trip per message.
const MARK_SENT: &str = "UPDATE {outbox}
    SET state = 'SENT', lease_owner = NULL, lease_until = NULL, last_error = NULL,
        updated_at = {now}
    WHERE id IN {ids_in_p1} AND lease_owner = $2 AND state = 'PENDING'";

/// `$1` id, `$2` owner, `$3` new state (PENDING or DEAD), `$4` delay ms, `$5` error.
const MARK_FAILED: &str = "UPDATE {outbox}
    SET state = $3, due_at = {now} + $4, last_error = $5, lease_owner = NULL,
        lease_until = NULL, updated_at = {now}
    WHERE id = $1 AND lease_owner = $2 AND state = 'PENDING'";

const REDRIVE_ONE: &str = "UPDATE {outbox}
    SET state = 'PENDING', attempts = 0, due_at = {now}, lease_owner = NULL,
        lease_until = NULL, updated_at = {now}
    WHERE message_id = $1 AND state = 'DEAD'";

const REDRIVE_ALL: &str = "UPDATE {outbox}
    SET state = 'PENDING', attempts = 0, due_at = {now}, lease_owner = NULL,
        lease_until = NULL, updated_at = {now}
    WHERE state = 'DEAD'";

/// Commit of a prepared row: due now for the relay (or the fast path).
const COMMIT_PREPARED: &str = "UPDATE {outbox}
    SET state = 'PENDING', due_at = {now}, lease_owner = NULL, lease_until = NULL,
        updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'";

/// The producer's own commit, leased to its relay (`$2` owner, `$3` lease ms) in the same
/// statement, so the fast path publishes without a second round trip to lease the row.
const COMMIT_PREPARED_LEASED: &str = "UPDATE {outbox}
    SET state = 'PENDING', due_at = {now}, lease_owner = $2, lease_until = {now} + $3,
        attempts = attempts + 1, updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'
    RETURNING {columns}";

const ROLLBACK_PREPARED: &str = "DELETE FROM {outbox} WHERE id = $1 AND state = 'PREPARED'";

/// A prepared row whose check-backs ran out: `$2` error.
const DEAD_PREPARED: &str = "UPDATE {outbox}
    SET state = 'DEAD', last_error = $2, due_at = {now}, updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'";

/// A receipt: `$1` message id, `$2` new state (COMPLETED or FAILED), `$3` the business
/// reason of a failure. Only a row still waiting for its receipt changes (PENDING too: the
/// receipt can overtake the relay's mark-sent), so a repeated receipt changes nothing.
const APPLY_RECEIPT: &str = "UPDATE {outbox}
    SET state = $2, last_error = $3, lease_owner = NULL, lease_until = NULL, updated_at = {now}
    WHERE message_id = $1 AND state IN ('PENDING', 'SENT')
    RETURNING {columns}";

/// Sent rows whose receipt is overdue (`$1` ms) go back to PENDING, due now, at most `$2`.
const REDELIVER_OVERDUE: &str = "UPDATE {outbox}
    SET state = 'PENDING', due_at = {now}, last_error = 'no receipt within the receipt timeout',
        updated_at = {now}
    WHERE id IN (
        SELECT id FROM {outbox}
        WHERE state = 'SENT' AND updated_at < {now} - $1
        ORDER BY updated_at
        LIMIT $2
        {skip_locked})";

/// The transition statements.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) mark_sent: SqlStr,
    pub(crate) mark_failed: SqlStr,
    pub(crate) redrive_one: SqlStr,
    pub(crate) redrive_all: SqlStr,
    pub(crate) commit_prepared: SqlStr,
    pub(crate) commit_prepared_leased: SqlStr,
    pub(crate) rollback_prepared: SqlStr,
    pub(crate) dead_prepared: SqlStr,
    pub(crate) apply_receipt: SqlStr,
    pub(crate) redeliver_overdue: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &Render<'_>) -> Self {
        Statements {
            mark_sent: r.sql(MARK_SENT),
            mark_failed: r.sql(MARK_FAILED),
            redrive_one: r.sql(REDRIVE_ONE),
            redrive_all: r.sql(REDRIVE_ALL),
            commit_prepared: r.sql(COMMIT_PREPARED),
            commit_prepared_leased: r.sql(COMMIT_PREPARED_LEASED),
            rollback_prepared: r.sql(ROLLBACK_PREPARED),
            dead_prepared: r.sql(DEAD_PREPARED),
            apply_receipt: r.sql(APPLY_RECEIPT),
            redeliver_overdue: r.sql(REDELIVER_OVERDUE),
        }
    }
}
