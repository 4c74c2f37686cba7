//! The outbox's statements (`outbox.rs`): a row's insert (born `PENDING` or `PREPARED`)
//! and the reads behind inspection, counts and lag.

use sqlx::SqlStr;

use super::Render;

const INSERT: &str = "INSERT INTO {outbox}
    (message_id, destination, msg_key, headers, payload, created_at_ms, state, producer_group,
     attempts, checks, due_at, enqueued_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 0, {now} + $9, {now}, {now})
    RETURNING id";

const GET: &str = "SELECT {columns} FROM {outbox} WHERE message_id = $1";

/// `$1` state, `$2` after id, `$3` limit.
const LIST_STATE: &str =
    "SELECT {columns} FROM {outbox} WHERE state = $1 AND id > $2 ORDER BY id LIMIT $3";

const COUNTS: &str = "SELECT state, COUNT(*) FROM {outbox} GROUP BY state";

/// Milliseconds the oldest due pending row has waited (NULL when none is due).
const LAG: &str =
    "SELECT {now} - MIN(due_at) FROM {outbox} WHERE state = 'PENDING' AND due_at <= {now}";

/// The outbox's statements.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) insert: SqlStr,
    pub(crate) get: SqlStr,
    pub(crate) list_state: SqlStr,
    pub(crate) counts: SqlStr,
    pub(crate) lag: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &Render<'_>) -> Self {
        Statements {
            insert: r.sql(INSERT),
            get: r.sql(GET),
            list_state: r.sql(LIST_STATE),
            counts: r.sql(COUNTS),
            lag: r.sql(LAG),
        }
    }
}
