//! The re-drive audit (`audit.rs`): record a re-drive, list records.

use sqlx::SqlStr;

use super::Render;

const AUDIT_INSERT: &str = "INSERT INTO {audit}
    (actor, adapter, message_id, from_destination, to_destination, consumer_group, redriven_at)
    VALUES ($1, $2, $3, $4, $5, $6, {now})
    RETURNING id, redriven_at";

/// `$1` after id, `$2` limit.
const AUDIT_LIST: &str = "SELECT id, actor, adapter, message_id, from_destination, to_destination,
        consumer_group, redriven_at
    FROM {audit} WHERE id > $1 ORDER BY id LIMIT $2";

/// The audit's statements.
#[derive(Clone, Debug)]
pub(crate) struct Statements {
    pub(crate) insert: SqlStr,
    pub(crate) list: SqlStr,
}

impl Statements {
    pub(crate) fn render(r: &Render<'_>) -> Self {
        Statements {
            insert: r.sql(AUDIT_INSERT),
            list: r.sql(AUDIT_LIST),
        }
    }
}
