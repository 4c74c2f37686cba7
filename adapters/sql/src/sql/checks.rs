//! Check-back leases (`checker.rs`): find prepared rows due for a check, and claim one
//! for a check interval.

use sqlx::SqlStr;

use super::Render;

/// Prepared rows of `$1` due for a check-back, at most `$2`.
const CHECK_CANDIDATES: &str = "SELECT {columns} FROM {outbox}
    WHERE state = 'PREPARED' AND producer_group = $1 AND due_at <= {now}
    ORDER BY due_at, id
    LIMIT $2
    {skip_locked}";

/// Counts a check and pushes the next one `$2` ms out.
const CLAIM_CHECK: &str = "UPDATE {outbox}
    SET checks = checks + 1, due_at = {now} + $2, updated_at = {now}
    WHERE id = $1 AND state = 'PREPARED'
    RETURNING checks";

/// The checker's statements.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) check_candidates: SqlStr,
    pub(crate) claim_check: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &Render<'_>) -> Self {
        Statements {
            check_candidates: r.sql(CHECK_CANDIDATES),
            claim_check: r.sql(CLAIM_CHECK),
        }
    }
}
